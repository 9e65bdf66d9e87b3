// Beam's FlinkJobServerDriver, run as ../LoopbackJobServer.java: the same flags and job
// service, with the job and artifact ports bound to --job-host only.
package ferpipeline.engines.flink;

import ferpipeline.engines.LoopbackJobServer;
import org.apache.beam.runners.flink.FlinkJobInvoker;
import org.apache.beam.runners.flink.FlinkJobServerDriver;
import org.apache.beam.runners.flink.FlinkJobServerDriver.FlinkServerConfiguration;

public final class LoopbackFlinkJobServer {

  private LoopbackFlinkJobServer() {}

  public static void main(String[] args) {
    LoopbackJobServer.setUpFileSystems();
    FlinkServerConfiguration configuration = FlinkJobServerDriver.parseArgs(args);
    new LoopbackJobServer(configuration, () -> FlinkJobInvoker.create(configuration)).run();
  }
}
