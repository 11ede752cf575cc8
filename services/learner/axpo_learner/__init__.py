"""The axpo learner: batches from groups, the policy update, checkpoints, weight publication."""
