"""The outputs room: everything a dataset is written as, none of it knowing the model.

sink        Finished (one image), Outputs (where each goes), RunResult (what a run did)
archive     ArchiveWriter: the zip, streamed and published atomically; PNG and names
webdataset  WebDataset tar shards;  parquet  the Hub's Parquet shards
formats     tensors.pt / normalized.pt / the challenge's <preset>.pt
manifest    manifest.json (ModelFacts: what the caller says of the model)
card        README.md, the Hugging Face dataset card, from the manifest
card_loading  the card's loading recipes, one per format
preview     the contact sheet
"""
