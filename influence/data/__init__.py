"""The images an analysis reads: ImageNet's layouts on disk (archives, Kaggle, class folders), the image
datasets over them and their fingerprints, the evaluation preprocessing, the query images a user chooses,
and the offline demo's generated folder."""
