"""DPO stage: direct preference optimization against a frozen reference (gpt_dpo.yaml)."""
