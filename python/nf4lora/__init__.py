"""nf4lora"""
