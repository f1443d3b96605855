"""Connections to evaluation harnesses: `harness.PrunedLMM` answers lmms-eval's requests with any
supported model and pipeline; `lmms_eval` registers it with lmms-eval (extra `tokenprune[eval]`)."""
