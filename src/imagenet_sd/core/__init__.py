"""What every stage shares: params validated into typed objects, errors, atomic files, locks, seeds, devices, torchrun, the stage CLI."""
