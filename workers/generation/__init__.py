"""The generation worker: engines, the critique-and-revise trajectory, the claim loop."""
