"""axpo reward verifier: answer extraction, checkers and reward composition.

The modules are plain Python (no gRPC): :mod:`axpo_verifier.extract` finds the answer in a model
output, :mod:`axpo_verifier.numbers` reads numbers, :mod:`axpo_verifier.checkers` compares
answers with gold answers, :mod:`axpo_verifier.mathcheck` runs math-verify in killable worker
processes, :mod:`axpo_verifier.formatting` scores the output's structure and
:mod:`axpo_verifier.verifier` puts it together into rewards.
"""
