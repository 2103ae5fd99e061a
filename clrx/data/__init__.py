"""The data a run trains on: the dataset factories (datasets), the train/validation pair and its
loaders (splits), and the batch augmentation that runs on the device (augment)."""
