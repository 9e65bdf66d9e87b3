// Beam's FlinkJobServerDriver with its job and artifact servers bound to --job-host only
// (../BoundServerFactory.java says why). Same flags, same job service.
package ferpipeline.engines.flink;

import ferpipeline.engines.BoundServerFactory;
import org.apache.beam.runners.flink.FlinkJobInvoker;
import org.apache.beam.runners.flink.FlinkJobServerDriver;
import org.apache.beam.runners.flink.FlinkJobServerDriver.FlinkServerConfiguration;
import org.apache.beam.runners.jobsubmission.JobServerDriver;
import org.apache.beam.sdk.extensions.gcp.options.GcsOptions;
import org.apache.beam.sdk.io.FileSystems;
import org.apache.beam.sdk.options.PipelineOptions;
import org.apache.beam.sdk.options.PipelineOptionsFactory;

public final class LoopbackFlinkJobServer extends JobServerDriver {

  private LoopbackFlinkJobServer(FlinkServerConfiguration configuration) {
    super(configuration, new BoundServerFactory(configuration.getHost()),
        new BoundServerFactory(configuration.getHost()),
        () -> FlinkJobInvoker.create(configuration));
  }

  public static void main(String[] args) {
    // What FlinkJobServerDriver.main sets up before it starts the service.
    PipelineOptions options = PipelineOptionsFactory.create();
    options.as(GcsOptions.class).setGcsUploadBufferSizeBytes(1024 * 1024);
    FileSystems.setDefaultPipelineOptions(options);
    new LoopbackFlinkJobServer(FlinkJobServerDriver.parseArgs(args)).run();
  }
}
