// Beam's SparkJobServerDriver with its job and artifact servers bound to --job-host only
// (../BoundServerFactory.java says why). Same flags, same job service.
package ferpipeline.engines.spark;

import ferpipeline.engines.BoundServerFactory;
import org.apache.beam.runners.jobsubmission.JobServerDriver;
import org.apache.beam.runners.spark.SparkJobInvoker;
import org.apache.beam.runners.spark.SparkJobServerDriver;
import org.apache.beam.runners.spark.SparkJobServerDriver.SparkServerConfiguration;
import org.apache.beam.sdk.extensions.gcp.options.GcsOptions;
import org.apache.beam.sdk.io.FileSystems;
import org.apache.beam.sdk.options.PipelineOptions;
import org.apache.beam.sdk.options.PipelineOptionsFactory;

public final class LoopbackSparkJobServer extends JobServerDriver {

  private LoopbackSparkJobServer(SparkServerConfiguration configuration) {
    super(configuration, new BoundServerFactory(configuration.getHost()),
        new BoundServerFactory(configuration.getHost()),
        () -> SparkJobInvoker.create(configuration));
  }

  public static void main(String[] args) {
    // What SparkJobServerDriver.main sets up before it starts the service. Beam's driver
    // has no public argument parser; its public configuration field is the parsed flags.
    PipelineOptions options = PipelineOptionsFactory.create();
    options.as(GcsOptions.class).setGcsUploadBufferSizeBytes(1024 * 1024);
    FileSystems.setDefaultPipelineOptions(options);
    SparkJobServerDriver parsed = SparkJobServerDriver.fromParams(args);
    new LoopbackSparkJobServer((SparkServerConfiguration) parsed.configuration).run();
  }
}
