// Beam's SparkJobServerDriver, run as ../LoopbackJobServer.java: the same flags and job
// service, with the job and artifact ports bound to --job-host only.
package ferpipeline.engines.spark;

import ferpipeline.engines.LoopbackJobServer;
import org.apache.beam.runners.spark.SparkJobInvoker;
import org.apache.beam.runners.spark.SparkJobServerDriver;
import org.apache.beam.runners.spark.SparkJobServerDriver.SparkServerConfiguration;

public final class LoopbackSparkJobServer {

  private LoopbackSparkJobServer() {}

  public static void main(String[] args) {
    LoopbackJobServer.setUpFileSystems();
    // Beam's Spark driver has no public argument parser; the driver it builds from the
    // flags holds them, parsed, in its public configuration field.
    SparkServerConfiguration configuration =
        (SparkServerConfiguration) SparkJobServerDriver.fromParams(args).configuration;
    new LoopbackJobServer(configuration, () -> SparkJobInvoker.create(configuration)).run();
  }
}
