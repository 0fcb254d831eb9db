"""Evaluation: GenEval-layout text-to-image generation and Shapes judging (`t2i`), image-to-text
(`i2t`) and editing (`edit`) suites on the Shapes world, DPG-Bench grids (`dpg`), the exact
`ShapesOracle` used to check them (`oracle`), contact sheets, and the `unipic eval` / `unipic
data` subcommands (`cli`). Evaluators take any `UnifiedPipeline` and return plain dicts.
"""
