"""The foundation every other layer stands on: the contract (names, features, signatures,
output files), the config, file I/O on local disks and object stores, the error types,
the quiet filters, artifacts and commit records, the Beam job wrapper, the FER CSV reader,
the serving-root layout, the ensemble rule, the shared data checks and the HTML pages'
frame. It imports nothing of the other layers (docs/architecture.md, "The layers")."""
