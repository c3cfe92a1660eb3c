"""TF Serving gRPC client and a PredictionService server for exported models."""
