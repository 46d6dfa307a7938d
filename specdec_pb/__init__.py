"""Generated from protos/ by scripts/gen_protos. Do not edit."""
