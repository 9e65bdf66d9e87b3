"""Serving: the embedded TF-Serving-protocol server and the ensemble client. Importing it
changes nothing in the process: the console scripts (fer-serve, fer-client, fer-review)
install core/quiet.py's filters themselves, before TensorFlow loads."""
