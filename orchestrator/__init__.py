"""The orchestrator: the one service clients call. Owns acceptance and randomness."""
