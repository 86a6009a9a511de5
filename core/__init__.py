"""What every stage of clipkd stands on, imported by harness/, evals/ and results/ and importing none of them:
the error every message is, the process group with its gathers and votes, the built-in datasets, precision."""
