"""The login-node half: submit runs and sweeps, follow them, report on them. Never imports torch or mpi4py
(tests/test_layout.py checks), so login-node commands stay fast and light."""
