"""The paper's table rows and figure points as named DVC experiments, and the command that queues them."""
