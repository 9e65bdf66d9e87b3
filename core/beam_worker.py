"""The start-up of a Beam SDK worker process, named to Beam with `--beam_plugins`.

A worker (the multi-processing DirectRunner's subprocesses, the Flink and Spark worker
pools', Dataflow's) runs no entry point of ours: it unpickles a step's functions, and
importing their modules loads TensorFlow, TFDV and Google's client libraries, whose known
noise would then reach the user's terminal through the worker's stderr. Beam imports every
plugin module when the worker starts, before any of that, so this module is the worker's
entry point: importing it installs the quiet filters (core/quiet.py) and does nothing else.
`core/beam_job.beam_pipeline` adds it to every pipeline's options.
"""
from fer_pipeline.core import quiet

__all__: list[str] = []

quiet.install()
