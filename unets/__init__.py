"""unets: interchangeable video U-Nets assembled from spacetime layers by a registry."""
