"""Engine: model loading, image handling and the explanation pipeline."""
