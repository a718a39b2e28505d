"""Getting images into arrays: CIFAR-10, image folders, crawling, anime-face crops."""
