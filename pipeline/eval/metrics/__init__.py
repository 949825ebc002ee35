"""Image-translation metrics: FID/KID over features (`distribution`), paired L1/PSNR/SSIM (`paired`), and the
feature extractors they use (`features`, with an Inception-v3 that loads FID's weights from a local file)."""
