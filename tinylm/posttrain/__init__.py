"""Post-training stages: DPO, distillation, reasoning, GRPO/CISPO, reward model, PPO, agentic RL."""
