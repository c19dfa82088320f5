"""City identification from satellite images: synthetic world, patches and split, data and sampling, training, metrics and intervals, similarity, saliency, figures."""
