// Beam's job service (the one FlinkJobServerDriver and SparkJobServerDriver run) with its
// job and artifact servers bound to --job-host only (BoundServerFactory.java says why).
// flink/ and spark/ hold the mains: each parses its engine's flags and names its invoker.
package ferpipeline.engines;

import org.apache.beam.runners.jobsubmission.JobServerDriver;
import org.apache.beam.sdk.extensions.gcp.options.GcsOptions;
import org.apache.beam.sdk.io.FileSystems;
import org.apache.beam.sdk.options.PipelineOptions;
import org.apache.beam.sdk.options.PipelineOptionsFactory;

public final class LoopbackJobServer extends JobServerDriver {

  public LoopbackJobServer(ServerConfiguration configuration, JobInvokerFactory invokers) {
    this(configuration, new BoundServerFactory(configuration.getHost()), invokers);
  }

  private LoopbackJobServer(
      ServerConfiguration configuration, BoundServerFactory servers, JobInvokerFactory invokers) {
    super(configuration, servers, servers, invokers);
  }

  /** What Beam's Flink and Spark driver mains set up before they start the service. */
  public static void setUpFileSystems() {
    PipelineOptions options = PipelineOptionsFactory.create();
    options.as(GcsOptions.class).setGcsUploadBufferSizeBytes(1024 * 1024);
    FileSystems.setDefaultPipelineOptions(options);
  }
}
