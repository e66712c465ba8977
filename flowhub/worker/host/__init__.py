"""flowhub layer: flowhub.worker.host"""
