"""GPU tests (NCCL): see conftest.py for when they run."""
