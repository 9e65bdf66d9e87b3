// Beam's Flink and Spark job servers ship their whole classpath (about 200 MB of jars) to
// the cluster with every job: Flink uploads it to the JobManager's blob server and every
// TaskManager downloads it again; Spark serves it to each new executor. Measured on the
// local 2-core clusters that was 20-30 s of every job's start. The local clusters'
// daemons (tools/local_cluster.py) already have those very jars on their own
// classpath and load Beam's classes parent-first, so nothing needs shipping.
//
// This factory, named by the pipeline option
//   --pipeline_resources_detector_factory_class=ferpipeline.engines.NothingToStage
// (local_cluster.Cluster.beam_args adds it), makes the job server detect no resources
// to stage. `make engines` compiles it into .engines/fer-engines.jar, which is on the
// job servers' and daemons' classpath. A cluster whose daemons lack Beam's jars (any
// stock Flink or Spark installation) must NOT be given this option.
package ferpipeline.engines;

import java.util.Collections;
import org.apache.beam.sdk.util.construction.resources.PipelineResourcesDetector;

public final class NothingToStage implements PipelineResourcesDetector.Factory {

  /** Beam builds the factory through this method (InstanceBuilder.fromFactoryMethod). */
  public static NothingToStage create() {
    return new NothingToStage();
  }

  @Override
  public PipelineResourcesDetector getPipelineResourcesDetector() {
    return classLoader -> Collections.emptyList();
  }
}
