"""The draft service: the small T5 proposes k tokens per step."""
