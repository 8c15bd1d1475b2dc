"""What every layer may use and nothing of ours is imported by: the config schema and its
validation, the error type, special token ids, mesh axes and the logical-axis table, file-system
access (local and gs://), console and runtime set-up for the CLIs."""
