"""sd-generate: prompts -> images in resumable shards, their cost, the published dataset and its sample grid."""
