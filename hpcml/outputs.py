"""Names of the files a run writes into its output directory.

Their own module so that the login-node side (submission, `hpcml status`, sweeps) can find them without
importing the trainer, and with it torch: about a second of every login-node command.
"""

# Rank 0's summary of a finished run (hpcml.trainer.TrainingResult, plus every rank's checksum).
RESULT_FILE = "result.json"
# The final weights.
MODEL_FILE = "model.pt"
# Which Slurm job (and restart of it) last wrote the directory (hpcml.runtime.record_job).
JOB_RECORD = "slurm_job.json"
