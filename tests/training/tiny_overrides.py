"""Overrides that shrink any run file to a few-second run of the tiny preset.

A module of its own (not conftest) so test files can import it without clashing with other
folders' conftest modules.
"""

# Turns any run file into a few-second run of the tiny preset (4x4 token grid, byte tokenizer).
TINY = [
    "model.init_from=unipic1-tiny",
    "model.init_vae_from=null",
    "model.tokenizer=auto",
    "data.source=world",
    "data.image_size=64",
    "data.batch_size=2",
    "train.max_steps=3",
    "train.checkpoint_every=0",
    "train.num_threads=1",  # tiny models gain little from threads; robust on a busy machine
    "optim.lr=1e-3",
    "optim.warmup_ratio=0",
    "log.progress=false",
    "log.every=1",
    "log.plot_every=0",
    "log.sample_every=0",
    "log.eval_every=0",
]
