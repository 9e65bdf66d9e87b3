"""The FER pipeline's orchestration. Importing it changes nothing in the process: the entry
points (pipeline/cli.py, the Kubeflow components in pipeline/kfp_pipeline.py) install
core/quiet.py's filters themselves, before anything imports TensorFlow."""
