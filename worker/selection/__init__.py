"""The selection room: where a job's pixels come from when it starts from real images.

sources     prepare(spec) -> a Source: the picked real images (random_real, herding,
            kcenter) or image-to-image from k-means prototypes of VAE latents
coreset     select k per class on ConvNet-3 features
references  a reference set's classes as uint8 arrays (centre square, bicubic)
"""
