"""The model room: everything that holds or drives a diffusers pipeline.

    loading     LoadOptions (from settings), load / wrap -> Generator, the optional tiny decoder
    generator   Generator: one warm pipeline; SamplingParams, Conditioning; sample, render
    prompts     PromptCache: each distinct prompt through the text encoders once per worker
    latents     the VAE's latent scaling (both ways), on-device resizing, pipeline geometry
    compiling   torch.compile modes, warm-up, the batch-size search
    quiet       library notices and progress bars kept out of the output
    tiny_model  tiny random-weight pipelines built offline (``python -m worker.model.tiny_model``)

Imports run one way: loading -> compiling -> generator -> prompts, latents.
"""
