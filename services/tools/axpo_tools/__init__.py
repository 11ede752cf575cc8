"""axpo tool server: the tools a vision-language model calls during RL rollouts.

:mod:`axpo_tools.sandbox` runs model-written Python in an isolated, resource-limited process.
"""
