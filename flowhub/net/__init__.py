"""flowhub layer: flowhub.net"""
