"""ED-LoRA training: the trainer (`trainer`) and its image folders and augmentation (`data`)."""
