"""Data: TFDS array_record builders, the grain input pipeline, the SentencePiece tokenizer.

  builders.py    demo / folder / webdataset builders (`python -m coca_jax.data.build`)
  sources.py     `open_source`: a prepared split (ours or a TFDS catalog dataset) to read
  pipeline.py    `make_train_iterator` (streaming or in-memory input path), `make_eval_source`
  mixture.py     `make_mixture_iterator`: several datasets by weight (config.data.sources),
                 labelled datasets as templated text
  decoded_cache.py  a small split decoded once into memory-mapped uint8 arrays (in-memory path)
  prepare.py     `prepare_data`: demo dataset and tokenizer ready before a run
  preprocess.py  decode, resize, random-resized-crop, `normalize_images`
  tokenizer.py   `Tokenizer` (`python -m coca_jax.data.tokenizer train`)
  digit_scenes.py  the offline demo image-caption generator

Submodules are imported explicitly (TFDS and grain are slow to import and the tokenizer alone
does not need them).
"""
