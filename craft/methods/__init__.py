"""The training methods (craft, sft, dpo, grpo), each a type in a registry, and the step helpers they share."""
