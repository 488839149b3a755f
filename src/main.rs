fn main() {
    println!("r2scp: being written");
}
