"""What both pipelines share: config, files, errors and the entry wrapper, run stamps, backbones, the training core, CAMs, shards, runtime."""
