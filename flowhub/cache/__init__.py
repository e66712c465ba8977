"""flowhub layer: flowhub.cache"""
