"""He et al.'s language enhancement (prompt le): a T5 writes each image's sentence from its class name."""
