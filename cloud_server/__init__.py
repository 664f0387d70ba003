"""The cloud server process: global encoders, distillation, round orchestration."""
