"""One-off tools that build or rewrite checkpoints (not imported by the engine).

Import what you need from its module (`flashmoe.tools.smollm2.convert_smollm2`,
`flashmoe.tools.requant.requant`) so one tool never pulls in another's dependencies.
"""
