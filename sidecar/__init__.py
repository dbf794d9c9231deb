"""Real-time anomaly detection sidecar for MQTT IoT networks."""
