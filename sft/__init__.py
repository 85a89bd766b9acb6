"""SFT stage: supervised fine-tuning on prep's chosen dialogues or a prompt/response JSONL (gpt_sft.yaml)."""
