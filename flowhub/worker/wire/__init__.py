"""flowhub layer: flowhub.worker.wire"""
